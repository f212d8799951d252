import os

from django.contrib.auth import views as auth_views
from django.http import JsonResponse
from django.urls import include, path
from jwcrypto import jwk


def impostor_jwks(request):
    """A key set whose key id is the real signing key's but whose key is another: a provider
    (or someone between it and us) publishing keys that do not match its ID tokens."""
    real = jwk.JWK.from_pem(os.environ["IDP_SIGNING_KEY"].encode())
    impostor = jwk.JWK.generate(kty="RSA", size=2048)
    public = impostor.export_public(as_dict=True)
    public.update(alg="RS256", use="sig", kid=real.thumbprint())
    return JsonResponse({"keys": [public]})


urlpatterns = [path("login/", auth_views.LoginView.as_view(), name="login")]
if os.environ.get("IDP_IMPOSTOR_JWKS"):
    urlpatterns.append(path("o/.well-known/jwks.json", impostor_jwks))
urlpatterns.append(path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")))
