"""Shared test set-up: few threads (2-core CI), deterministic seeds, tiny CT problems."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# -- Qt (workbench tests): never touch the user's QSettings -----------------------------
@pytest.fixture
def wb_settings(tmp_path):
    """A QSettings in a temporary INI file; the default user scope is redirected too."""
    from PySide6.QtCore import QSettings

    folder = tmp_path / "qsettings"
    folder.mkdir()
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(folder))
    return QSettings(str(folder / "workbench.ini"), QSettings.Format.IniFormat)
