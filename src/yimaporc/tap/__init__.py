"""yimaporc.tap."""
