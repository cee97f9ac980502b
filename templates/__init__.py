"""Triton kernel templates (*.py.jinja) rendered by cce_inductor.lowering."""
