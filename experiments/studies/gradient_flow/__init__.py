"""The "Keep the Gradients Flowing" study: the EGF sweep and its report."""
