"""Policy plugins: the loader of plugin files and the guard every call into policy code goes through."""
