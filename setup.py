"""Build hook: generate the gRPC stubs from protos/ so they are built, not committed."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithStubs(build_py):
    def run(self):
        sys.path.insert(0, str(ROOT))
        from mmserve_core.wire import protogen

        protogen.generate(ROOT / "protos")
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
