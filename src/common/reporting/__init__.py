"""The top layer: notebook sessions (``setup``), claims and REPORT.md, the papermill runner, the GPU check."""
