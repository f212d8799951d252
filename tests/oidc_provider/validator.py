from oauth2_provider.oauth2_validators import OAuth2Validator


class EmailClaimsValidator(OAuth2Validator):
    """Puts the person's email in the ID token. A user whose first name is "unverified" has an
    email the provider has not verified (email_verified: false)."""

    oidc_claim_scope = None  # every claim goes in the ID token, whatever the scopes

    def get_additional_claims(self, request):
        user = request.user
        return {
            "email": user.email,
            "email_verified": user.first_name != "unverified",
            "name": user.last_name or user.email,
        }
