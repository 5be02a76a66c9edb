"""The bundle's entry point: both of its executables run this script, and it dispatches on the name
it was started as. ``equideq`` is the command line (:func:`engine.cli.main`); ``equideq-workbench``
(and any other name) is the desktop app (:func:`workbench.app.main`). One script analysed once keeps
one copy of every module, and the two executables still differ where a platform needs it (Windows:
a console for the CLI, none for the app).
"""

import multiprocessing
import sys
from pathlib import Path

CLI_NAME = "equideq"


def main() -> int:
    multiprocessing.freeze_support()  # a frozen child process (spawn) runs its task here, not the app
    if Path(sys.executable).stem.lower() == CLI_NAME:
        from engine.cli import main as cli_main

        return cli_main()
    from workbench.app import main as workbench_main

    return workbench_main()


if __name__ == "__main__":
    sys.exit(main())
