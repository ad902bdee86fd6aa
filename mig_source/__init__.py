"""mig_source: the daemon that runs a guest and migrates it away."""
