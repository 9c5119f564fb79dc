"""yimaporc.porcupine."""
