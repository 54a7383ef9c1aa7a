"""Build hook: the optional C extensions (``optional=True``: without a compiler the install
still succeeds and the pure-Python paths are used).

* ``_speedups``: the scan of SIP headers (sipsniff_acc/_speedups.c; sip.py falls back).
* ``_ring``: the TPACKET_V3 block walk of live capture (sipsniff_acc/_ring.c; sources/live.py
  falls back to ``_walk_py``).
* ``_capture``: the pcap record walk, the common UDP decode and ``looks_like_sip``
  (sipsniff_acc/_capture.c; pcapfile.py, decode.py and sip.py fall back). No FP contraction:
  a frame's timestamp must be Python's ``sec + frac * unit`` to the last bit.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("sipsniff_acc._speedups", ["sipsniff_acc/_speedups.c"], optional=True),
    Extension("sipsniff_acc._ring", ["sipsniff_acc/_ring.c"], optional=True),
    Extension("sipsniff_acc._capture", ["sipsniff_acc/_capture.c"], optional=True,
              extra_compile_args=["-ffp-contract=off"]),
])
