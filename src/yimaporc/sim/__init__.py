"""yimaporc.sim."""
