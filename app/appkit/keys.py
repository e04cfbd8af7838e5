"""Keyboard shortcuts keep working after a click on the image (and the page can scroll to its top).

The clickable image lives in an iframe (a Streamlit component); after a click the keyboard
focus is inside it and the page's button shortcuts (A, D, N, U, Z, arrows, Ctrl+Enter) would
not see the keys. This small script, run once per page in the app's own document, forwards
key presses (keydown and keyup, so no key seems held) from the image frames to the page. The
frames are served by this app (same origin), so nothing crosses an origin boundary.

Streamlit matches a shortcut's modifiers exactly, so Shift+A (or A with Caps Lock and Shift)
was not A. The script hands the page a Shift+A, D, N or U (:data:`UNSHIFTED_KEYS`; never in a
text field, never with Ctrl, Alt or Cmd) as the plain key; Shift+Z stays "zoom out".
"""

from __future__ import annotations

import streamlit as st

FRAME_SELECTOR = 'iframe[title^="streamlit_image_coordinates"]'
#: letters whose shortcut also answers with Shift held (Z is not here: Shift+Z is "zoom out")
UNSHIFTED_KEYS = "ADNU"

_SCRIPT = """
<script>
(() => {
  if (window.__cellspotKeyForwarding) return;
  window.__cellspotKeyForwarding = true;
  const letters = '__UNSHIFTED__';
  const editable = (el) => !!el && (el.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(el.tagName || ''));
  // Shift+A (and Caps Lock with Shift) is A for the label shortcuts: the event goes on as the plain key
  const unshift = (event) => {
    if (event.__cellspotUnshifted || !event.shiftKey || event.ctrlKey || event.altKey || event.metaKey) return;
    const code = /^Key[A-Z]$/.test(event.code || '') ? event.code.slice(3) : (event.key || '').toUpperCase();
    if (code.length !== 1 || !letters.includes(code) || editable(event.target)) return;
    event.stopImmediatePropagation();
    const plain = new KeyboardEvent(event.type, {
      key: code.toLowerCase(), code: event.code, keyCode: event.keyCode, which: event.which,
      shiftKey: false, repeat: event.repeat, bubbles: true, cancelable: true,
    });
    plain.__cellspotUnshifted = true;
    (event.target || document.body).dispatchEvent(plain);
    if (plain.defaultPrevented) event.preventDefault();
  };
  window.addEventListener('keydown', unshift, true);
  window.addEventListener('keyup', unshift, true);
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
""".replace("__FRAMES__", FRAME_SELECTOR).replace("__UNSHIFTED__", UNSHIFTED_KEYS)


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
