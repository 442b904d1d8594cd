"""The web console: a dependency-free single-page app served from the API at /ui."""
