"""The Prefect side of takeoff-cache: tasks, flows and what drives Prefect itself.

``tasks`` and ``flows`` live at the repository root (where ``prefect deploy``
finds them by path) and are installed here, under the project's own name, so
that no package called ``tasks`` or ``flows`` lands in site-packages. Importing
this package imports nothing of Prefect.
"""
