"""Build hook: the optional C scan of SIP headers (see sipsniff_acc/_speedups.c).

``optional=True``: without a compiler the install still succeeds and sip.py uses its
pure-Python path.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("sipsniff_acc._speedups", ["sipsniff_acc/_speedups.c"], optional=True)])
