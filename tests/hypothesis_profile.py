"""A pytest plugin for every test (``-p hypothesis_profile`` in pyproject.toml): Hypothesis
without a per-example deadline.

The suite runs its pure property tests on the same 2 cores as three workers booting QEMU guests,
so one example's wall time says nothing about the code under test (a 200 ms deadline failed
`test_a_side_never_differs_from_itself` at 462 ms under load). Speed is measured in `bench/`.
"""

from hypothesis import settings

settings.register_profile("vmferry", deadline=None)
settings.load_profile("vmferry")
