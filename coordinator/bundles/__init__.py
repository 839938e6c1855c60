"""Device bundles: the request that names one, the memory plan for a profile, and the export."""
