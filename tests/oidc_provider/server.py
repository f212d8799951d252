"""Run the test identity provider: `python -m tests.oidc_provider.server SEED_JSON PORT`.

SEED_JSON names the people ({"username", "password", "email", "first_name"}) and the client
({"client_id", "client_secret", "redirect_uris"}). The database, signing key and issuer come
from the environment (see settings.py). Serves with uvicorn until killed.
"""

import json
import os
import sys


def main() -> None:
    seed_path, port = sys.argv[1], int(sys.argv[2])
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.oidc_provider.settings"
    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from oauth2_provider.models import Application

    call_command("migrate", verbosity=0, interactive=False)
    with open(seed_path) as seed_file:
        seed = json.load(seed_file)
    for person in seed["people"]:
        User.objects.create_user(
            username=person["username"],
            password=person["password"],
            email=person["email"],
            first_name=person.get("first_name", ""),
        )
    for client in seed["clients"]:
        Application.objects.create(
            name=client["client_id"],
            client_id=client["client_id"],
            client_secret=client["client_secret"],
            client_type=Application.CLIENT_CONFIDENTIAL,
            authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE,
            redirect_uris=" ".join(client["redirect_uris"]),
            algorithm=Application.RS256_ALGORITHM,
            skip_authorization=True,
        )

    import uvicorn
    from django.core.asgi import get_asgi_application

    uvicorn.run(get_asgi_application(), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
