"""An objective module that takes 30 s to import: a worker that is slow to start (a big model)."""

import time

time.sleep(30)


def never_called(recipe):
    raise AssertionError("the worker should have been given up on before this")
