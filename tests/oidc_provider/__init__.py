"""A real OpenID Connect provider for the single sign-on tests, in its own process.

django-oauth-toolkit (an independent, widely used implementation: authorization code flow,
PKCE, discovery, JWKS, RS256-signed ID tokens) inside a tiny Django project of its own, on
loopback, with its own SQLite file, cookies and signing key. Start it with `start_provider`;
the browser signs in at its login page like a person would.
"""
