"""Dialogs and docks that edit or report: settings, errors."""
