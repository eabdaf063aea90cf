"""lvopt's version: the one place it is written. setup.py reads it (without importing lvopt)
and appends the build's local label, +cu<CUDA>torch<torch> or +cputorch<torch> (the
convention of xformers' and flash-attention's wheels): the extension binds to the torch it was
compiled with, so a wheel's version and its ``torch==`` requirement name that torch."""

__version__ = "0.1.0"
