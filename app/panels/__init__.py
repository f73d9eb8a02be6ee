"""One module per dock panel; panels talk through the window's config, never to each other."""
