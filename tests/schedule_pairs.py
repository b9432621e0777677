"""Our beta schedules paired with their diffusers names, shared by the process and sampler tests."""

# (our schedule, diffusers beta_schedule, linear_start, linear_end)
SCHEDULES = [
    ("linear", "linear", 1e-4, 2e-2),
    ("scaled_linear", "scaled_linear", 0.00085, 0.012),
    ("cosine", "squaredcos_cap_v2", 1e-4, 2e-2),
]
