"""How Inductor builds the CCE kernels: lowerings, template choices, configs (cce_inductor.lowering)."""
