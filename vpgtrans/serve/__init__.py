"""`vpgtrans serve`: an OpenAI-compatible chat-completions server and a web chat page (extra `serve`)."""
