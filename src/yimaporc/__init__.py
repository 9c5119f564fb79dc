"""yimaporc: Yima (continuous media) and Porcupine (cluster mail) as Twisted protocols."""

__version__ = "0.1.0"
