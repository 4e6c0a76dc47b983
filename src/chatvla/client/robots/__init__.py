"""Robot adapters. Each hardware SDK is an optional extra imported lazily by its adapter module."""
