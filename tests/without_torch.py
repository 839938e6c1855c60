"""Run a module's command line as on a device without torch: `python -m tests.without_torch MODULE ARGS...`.

Any import of torch or transformers raises ImportError, as it would where `.[runtime]` alone is installed.
"""

import importlib.abc
import runpy
import sys


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"No module named {name!r} (blocked: this process plays a device without torch)")
        return None


if __name__ == "__main__":
    sys.meta_path.insert(0, _NoTorch())
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
