"""Hypothesis profiles: "ci" (the default) bounds example counts so the suite fits CI's time; "thorough" digs deeper.

Select with HYPOTHESIS_PROFILE=thorough. No deadlines: a shared 2-core machine makes timings noisy.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
