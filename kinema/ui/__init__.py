"""The web app, `kinema ui` (the `ui` extra: gradio): `build_app` makes the page, `launch_app` serves it.

Only `kinema.ui.app` imports gradio; the model scan (kinema.ui.models), the form's translations (kinema.ui.form), the
outputs folder and gallery (kinema.ui.gallery) and the latent preview (kinema.ui.preview) are plain modules,
usable and tested without it. Importing this package imports none of them.
"""

from kinema.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".app": ("build_app", "launch_app"),
    ".models": ("ModelChoices", "scan_models"),
    ".gallery": ("GalleryEntry", "read_gallery"),
    ".form": ("form_to_mapping", "settings_to_form"),
    ".preview": ("latent_preview",),
})
