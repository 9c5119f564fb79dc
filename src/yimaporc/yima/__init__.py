"""yimaporc.yima."""
