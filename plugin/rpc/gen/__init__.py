"""Generated from proto/ by ``python -m mobykit.rpc.generate``; do not edit."""
