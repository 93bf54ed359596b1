"""Ray Serve deployments and applications for search and inspection."""
