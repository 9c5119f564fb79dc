"""yimaporc.admin."""
