"""DRF's browsable API under the Content-Security-Policy.

Its templates (rest_framework/base.html and friends) carry inline styles, which the policy
refuses elsewhere; this page alone may apply them. Scripts stay 'self' only: the page shows a
tenant's data, and an inline style cannot run code.
"""

from csp.constants import UNSAFE_INLINE
from rest_framework.renderers import BrowsableAPIRenderer

INLINE_STYLES = {"style-src": [UNSAFE_INLINE]}


class CSPBrowsableAPIRenderer(BrowsableAPIRenderer):
    def render(self, data, accepted_media_type=None, renderer_context=None):
        response = (renderer_context or {}).get("response")
        if response is not None:
            response._csp_update = INLINE_STYLES  # read by csp.middleware.CSPMiddleware
        return super().render(data, accepted_media_type, renderer_context)
