"""yimaporc.cluster."""
