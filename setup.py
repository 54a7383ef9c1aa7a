"""Build hook: the optional native code (without a compiler, or without mypyc, the install
still succeeds and the pure-Python modules are used).

* ``_speedups``: the scan of SIP headers (sipsniff_acc/_speedups.c; sip.py falls back).
* ``_ring``: the TPACKET_V3 block walk of live capture (sipsniff_acc/_ring.c; sources/live.py
  falls back to ``_walk_py``).
* ``_capture``: the pcap record walk, the common UDP decode and ``looks_like_sip``
  (sipsniff_acc/_capture.c; pcapfile.py, decode.py and sip.py fall back). No FP contraction:
  a frame's timestamp must be Python's ``sec + frac * unit`` to the last bit.
* ``COMPILED``: the per-message path (parse, tracker, acc engine, records, log lines, the run
  loop) compiled by mypyc from the same typed sources: 1.3x on ``process`` (issue 13,
  docs/architecture.md). The .py files stay the reference and the fallback:
  tests/golden/test_pure_python.py runs both on the goldens. ``SIPSNIFF_PURE_PYTHON=1`` skips it.
"""

import os
import sys

from setuptools import Extension, setup

#: the modules mypyc compiles. Not events.py: _capture.c writes its slot classes' fields
#: by offset, which a compiled class does not have. Not sources/pcapfile.py: its loop is in
#: _capture.c already, and live.py subclasses its SourceError (a compiled class cannot be
#: subclassed by interpreted code).
COMPILED = [
    "sipsniff_acc/sip.py",
    "sipsniff_acc/decode.py",
    "sipsniff_acc/pipeline.py",
    "sipsniff_acc/tracker.py",
    "sipsniff_acc/pv.py",
    "sipsniff_acc/acc.py",
    "sipsniff_acc/records.py",
    "sipsniff_acc/sysloglines.py",
    "sipsniff_acc/emitters/syslog.py",
    "sipsniff_acc/processrun.py",
    # -j N on files: a worker's loop over every frame (the capture stage of every shard, the
    # parse of its own), like processrun's -j 0 loop (issue 13). No classes; filerun.py, which
    # tests patch, stays Python.
    "sipsniff_acc/fileworker.py",
]


#: the type checking mypyc needs, without the project's mypy settings (strict, the pydantic
#: plugin): a build environment holds setuptools and mypy only, the libraries' types are Any
MYPYC_OPTIONS = ["--config-file=", "--ignore-missing-imports", "--follow-imports=silent", "--python-version=3.11"]
#: the commands that build extensions (metadata and egg_info steps need no compiling: a
#: mypyc pass costs ~5 s of type checking before the ~40 s of C)
BUILDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def compiled() -> list[Extension]:
    if os.environ.get("SIPSNIFF_PURE_PYTHON") or not BUILDS & set(sys.argv[1:]):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("sipsniff-acc: mypyc is not installed: the pure-Python modules are used", file=sys.stderr)
        return []
    try:
        # one shared library inside the package (the default is a top-level module named by a
        # hash, which an editable install does not put on the path)
        return mypycify([*MYPYC_OPTIONS, *COMPILED], opt_level="3", group_name="sipsniff_acc._compiled")
    except (Exception, SystemExit) as exc:  # a mypy that rejects the sources: run them as Python
        print(f"sipsniff-acc: mypyc failed ({exc}): the pure-Python modules are used", file=sys.stderr)
        return []


setup(ext_modules=[
    Extension("sipsniff_acc._speedups", ["sipsniff_acc/_speedups.c"], optional=True),
    Extension("sipsniff_acc._ring", ["sipsniff_acc/_ring.c"], optional=True),
    Extension("sipsniff_acc._capture", ["sipsniff_acc/_capture.c"], optional=True,
              extra_compile_args=["-ffp-contract=off"]),
    *compiled(),
])
