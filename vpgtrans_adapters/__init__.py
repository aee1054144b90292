"""vpgtrans's built-in components, registered through the public entry-point API like any plugin."""
