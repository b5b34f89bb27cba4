"""Values the host and the guest must agree on, defined once.

Units: pages are ``PAGE_SIZE`` bytes; a gpfn (guest page frame number) indexes them.
"""

from __future__ import annotations

#: Bytes per page, on both sides of every channel (``hello`` and ``boot_ok`` carry it).
PAGE_SIZE = 4096

#: Buddy allocator orders are 0..MAX_ORDER: blocks of 1 page up to 4 MiB, as Linux's
#: MAX_PAGE_ORDER. ``balloon_alloc.max_order`` and ``report_isolate.min_order`` are bounded
#: by it.
MAX_ORDER = 10

#: The EPT is one byte per guest page, shared between the hypervisor (which writes it) and
#: the guest kernel (which checks it before every access): a page is backed by host memory
#: exactly when its entry is EPT_PRESENT.
EPT_NOT_PRESENT = 0
EPT_PRESENT = 1
