"""The ``loraplex`` command line: ``serve``, ``migrate``, ``admin``."""
