"""What the bundle leaves out, and why: read by equideq.spec (to leave it out) and by
bundle_report.py (to say so). Each entry was measured against a build with it left in
(packaging/README.md, "Bundle size"); the smoke test is what shows nothing needed went with it.

No __init__.py beside this file on purpose: a package named ``packaging`` would shadow the
PyPI ``packaging`` library that pip and PyInstaller import.
"""

from __future__ import annotations

import fnmatch

# Python modules PyInstaller would follow from an import statement somewhere, that no code path of
# the app runs: module name -> why it is not needed.
EXCLUDED_MODULES = {
    "tkinter": "the standard library's Tk GUI toolkit; the app's GUI is Qt",
    "_tkinter": "Tk's C extension (with tkinter)",
    "matplotlib": "imported by deepinv's plotting helpers, which the app never calls, and by pyqtgraph's colormap "
                  "menu to list matplotlib's maps when it is installed; the app's colormaps are pyqtgraph's own",
    "mpl_toolkits": "matplotlib's add-ons (with matplotlib)",
    "IPython": "interactive shells: imported only by notebook helpers of deepinv and tqdm",
    "pytest": "the test runner",
    "_pytest": "the test runner (with pytest)",
    "hypothesis": "property-based tests",
    "torch.utils.tensorboard": "TensorBoard logging, which the engine does not do (metrics.jsonl instead)",
    "triton": "torch.compile's GPU kernel compiler (~0.9 GB with its CUDA tools): the engine runs eagerly, and "
              "torch imports it only to ask whether it is there (run.compile is not supported in the bundle)",
    "tensorboard": "TensorBoard (with torch.utils.tensorboard)",
}

# Collected files, as glob patterns on their path inside the bundle's _internal folder: pattern -> why.
TORCH_TEST_LIBRARIES = "a library that only torch's own test suite loads"
EXCLUDED_FILES = {
    "PySide6/Qt/translations/*": "Qt's own UI translations; the app's texts are English only",
    "torch/test/*": "libtorch's C++ unit-test programs",
    "torch/bin/test_*": "libtorch's C++ test programs",
    "torch/bin/*Test": "libtorch's C++ test programs (distributed stores)",
    "torch/bin/protoc*": "the protobuf compiler, for building libtorch",
    "torch/lib/libjitbackend_test.*": TORCH_TEST_LIBRARIES,
    "torch/lib/libtorchbind_test.*": TORCH_TEST_LIBRARIES,
    "torch/lib/libaoti_custom_ops.*": TORCH_TEST_LIBRARIES,
    "torch/lib/libbackend_with_compiler.*": TORCH_TEST_LIBRARIES,
}


def excluded_file(dest: str) -> str | None:
    """The reason a file bound for ``dest`` (its path inside the bundle) is left out, or None."""
    dest = dest.replace("\\", "/")
    for pattern, why in EXCLUDED_FILES.items():
        if fnmatch.fnmatch(dest, pattern):
            return why
    return None
