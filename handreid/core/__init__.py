"""What every layer shares: errors, runtime, atomic files, config keys and files, the method
registry, the start-up call of the entry scripts."""
