"""Keyboard shortcuts keep working after a click on the image (and the page can scroll to its top).

The clickable image lives in an iframe (a Streamlit component); after a click the keyboard
focus is inside it and the page's button shortcuts (A, D, N, U, Z, arrows, Ctrl+Enter) would
not see the keys. This small script, run once per page in the app's own document, forwards
key presses (keydown and keyup, so no key seems held) from the image frames to the page. The
frames are served by this app (same origin), so nothing crosses an origin boundary.
"""

from __future__ import annotations

import streamlit as st

FRAME_SELECTOR = 'iframe[title^="streamlit_image_coordinates"]'

_SCRIPT = """
<script>
(() => {
  if (window.__cellspotKeyForwarding) return;
  window.__cellspotKeyForwarding = true;
  const hook = () => {
    document.querySelectorAll('__FRAMES__').forEach((frame) => {
      let inner;
      try { inner = frame.contentWindow; if (!inner || inner.__cellspotForwarded) return; }
      catch (err) { return; }
      inner.__cellspotForwarded = true;
      const forward = (event) => {
        const copy = new KeyboardEvent(event.type, {
          key: event.key, code: event.code, keyCode: event.keyCode, which: event.which,
          ctrlKey: event.ctrlKey, shiftKey: event.shiftKey, altKey: event.altKey,
          metaKey: event.metaKey, repeat: event.repeat, bubbles: true, cancelable: true,
        });
        document.body.dispatchEvent(copy);
        if (copy.defaultPrevented || event.key.startsWith('Arrow')) event.preventDefault();
      };
      inner.addEventListener('keydown', forward);
      inner.addEventListener('keyup', forward);
    });
  };
  hook();
  setInterval(hook, 400);
})();
</script>
""".replace("__FRAMES__", FRAME_SELECTOR)


_SCROLL = """
<script>
/* __NONCE__ */
document.querySelectorAll('[data-testid="stMain"], [data-testid="stAppViewContainer"]')
  .forEach((el) => el.scrollTo({top: 0}));
window.scrollTo({top: 0});
</script>
"""


def forward_keys_from_image_frames(scroll_nonce: str | None = None) -> None:
    """Make the page's keyboard shortcuts work while the focus is in the image frame.

    ``scroll_nonce``: also scroll the page to its top once (a new value per use, so the script
    runs again): after Submit or a zoom on a phone, where the buttons are below the image, the
    image would otherwise be out of sight. One element for both, so scrolling adds no gap.
    """
    script = _SCRIPT + (_SCROLL.replace("__NONCE__", scroll_nonce.replace("*/", "")) if scroll_nonce else "")
    st.html(script, unsafe_allow_javascript=True)
