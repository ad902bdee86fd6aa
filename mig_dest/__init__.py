"""mig_dest: the daemon that receives a migrating guest and runs it from then on."""
