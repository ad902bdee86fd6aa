"""A tiny x86 boot-sector guest of our own, emitted as machine code by Python (no assembler).

What it does (the memory invariant it maintains is checked by :mod:`tests.qemu_guest.invariant`):

1. real mode at 0x7C00: ``cli``, flat segments, fast A20 through port 0x92, ``lgdt`` of a flat
   3-entry GDT (null, 4 GiB code 0x08, 4 GiB data 0x10), CR0.PE=1, far jump into 32-bit code;
2. 32-bit protected mode, interrupts off forever (there is no IDT: an interrupt would triple
   fault, so none may be enabled):
   * init: set the FIRST BYTE of every 4 KiB page in [DIRTY_START, DIRTY_END) to 0 and the pass
     counter (dword at PASS_COUNTER_ADDR) to 0, so that whatever SeaBIOS left there the invariant
     starts from a known state;
   * loop forever: one *pass* increments the first byte of every page in [DIRTY_START,
     DIRTY_END) in ascending order; after the pass the dword counter is incremented and one
     marker character ``'A' + counter % 26`` is written to COM1 (port 0x3F8; QEMU's 16550 model
     accepts THR writes without any UART set-up).

Addresses: PASS_COUNTER_ADDR = 0x7E00, the first byte after the boot sector. It lies in
conventional memory that the BIOS leaves free (0x7E00..0x7FFFF), below our stack (which grows
down from 0x7C00 and is never used anyway) and far from the EBDA at 0x9FC00.

The guest needs RAM up to DIRTY_END (100 MiB): give it at least 128 MiB (``-m 128``).

The image is the 512-byte sector (signature 0x55AA at 510) padded with zeros to 1 MiB: SeaBIOS
cannot boot a 512-byte raw disk through q35's AHCI controller (see shared/notes/qemu.md).

``LISTING`` is the annotated disassembly (offset, bytes, instruction) produced by the same
code that emits the bytes; ``python -m tests.qemu_guest.bootsector`` prints it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ORG = 0x7C00
PASS_COUNTER_ADDR = 0x7E00
DIRTY_START = 0x100000  # 1 MiB
DIRTY_END = 0x6400000  # 100 MiB, exclusive
PAGE = 4096
DIRTY_PAGES = (DIRTY_END - DIRTY_START) // PAGE  # 25344
COM1 = 0x3F8
MARKERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SECTOR = 512
DISK_SIZE = 1 << 20
GUEST_MEMORY_MIB = 128  # what tests give the guest: RAM must reach past DIRTY_END

CODE_SEL = 0x08
DATA_SEL = 0x10


def _u16(v: int) -> bytes:
    return struct.pack("<H", v)


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def _rel8(target: int, next_ip: int) -> bytes:
    d = target - next_ip
    if not -128 <= d <= 127:
        raise ValueError(f"rel8 jump distance {d} out of range")
    return struct.pack("<b", d)


@dataclass
class _Item:
    """One instruction (or data blob): its size is fixed, its bytes may depend on labels."""

    size: int
    emit: Callable[[dict[str, int], int], bytes]  # (labels, address of this item) -> bytes
    text: str


class _Asm:
    """A two-pass micro-assembler: items have fixed sizes, so one pass places the labels and the
    second one emits bytes with every label known (forward jumps included)."""

    def __init__(self, org: int) -> None:
        self.org = org
        self.items: list[_Item | str] = []  # str = label definition

    def label(self, name: str) -> None:
        self.items.append(name)

    def ins(self, code: bytes, text: str) -> None:
        self.items.append(_Item(len(code), lambda _l, _a, code=code: code, text))

    def dyn(self, size: int, emit: Callable[[dict[str, int], int], bytes], text: str) -> None:
        self.items.append(_Item(size, emit, text))

    def align(self, n: int) -> None:
        # padding depends on the address, which is known once the previous items are placed
        addr = self.org + sum(it.size for it in self.items if isinstance(it, _Item))
        pad = -addr % n
        if pad:
            self.ins(b"\x90" * pad, f"nop x{pad} (align {n})")

    def assemble(self) -> tuple[bytes, list[tuple[int, bytes, str]]]:
        labels: dict[str, int] = {}
        addr = self.org
        for it in self.items:
            if isinstance(it, str):
                labels[it] = addr
            else:
                addr += it.size
        out = bytearray()
        listing: list[tuple[int, bytes, str]] = []
        addr = self.org
        for it in self.items:
            if isinstance(it, str):
                listing.append((addr, b"", f"{it}:"))
                continue
            code = it.emit(labels, addr)
            if len(code) != it.size:
                raise AssertionError(f"{it.text}: emitted {len(code)} bytes, declared {it.size}")
            out += code
            listing.append((addr, code, it.text))
            addr += it.size
        return bytes(out), listing


def _program() -> _Asm:
    a = _Asm(ORG)
    # ---------------------------------------------------------------- 16-bit real mode
    a.label("start")
    a.ins(b"\xfa", "cli                      ; no interrupts, ever (no IDT in protected mode)")
    a.ins(b"\xfc", "cld")
    a.ins(b"\x31\xc0", "xor ax, ax")
    a.ins(b"\x8e\xd8", "mov ds, ax               ; flat real-mode segments")
    a.ins(b"\x8e\xc0", "mov es, ax")
    a.ins(b"\x8e\xd0", "mov ss, ax")
    a.ins(b"\xbc" + _u16(ORG), "mov sp, 0x7C00")
    a.ins(b"\xe4\x92", "in al, 0x92              ; System Control Port A")
    a.ins(b"\x0c\x02", "or al, 0x02              ; bit 1: fast A20 gate on")
    a.ins(b"\x24\xfe", "and al, 0xFE             ; bit 0 would reset the machine: keep it 0")
    a.ins(b"\xe6\x92", "out 0x92, al")
    # lgdt m16&32: 0F 01 /2, modrm 0x16 = mod 00 reg 010 rm 110 (disp16)
    a.dyn(5, lambda lb, _a: b"\x0f\x01\x16" + _u16(lb["gdt_desc"]), "lgdt [gdt_desc]")
    a.ins(b"\x0f\x20\xc0", "mov eax, cr0")
    a.ins(b"\x0c\x01", "or al, 1                 ; CR0.PE")
    a.ins(b"\x0f\x22\xc0", "mov cr0, eax")
    # jmp ptr16:16 loads CS with the 32-bit code selector and flushes the prefetch queue
    a.dyn(5, lambda lb, _a: b"\xea" + _u16(lb["pm32"]) + _u16(CODE_SEL), "jmp 0x08:pm32")
    # ---------------------------------------------------------------- 32-bit protected mode
    a.label("pm32")
    a.ins(b"\x66\xb8" + _u16(DATA_SEL), "mov ax, 0x10             ; flat 4 GiB data selector")
    a.ins(b"\x8e\xd8", "mov ds, ax")
    a.ins(b"\x8e\xc0", "mov es, ax")
    a.ins(b"\x8e\xd0", "mov ss, ax")
    a.ins(b"\x8e\xe0", "mov fs, ax")
    a.ins(b"\x8e\xe8", "mov gs, ax")
    a.ins(b"\xbc" + _u32(ORG), "mov esp, 0x7C00")
    # init: first byte of every page := 0, counter := 0
    a.ins(b"\xb8" + _u32(DIRTY_START), "mov eax, DIRTY_START      ; 0x100000")
    a.label("clear")
    a.ins(b"\xc6\x00\x00", "mov byte [eax], 0")
    a.ins(b"\x05" + _u32(PAGE), "add eax, 0x1000")
    a.ins(b"\x3d" + _u32(DIRTY_END), "cmp eax, DIRTY_END        ; 0x6400000")
    a.dyn(2, lambda lb, ad: b"\x72" + _rel8(lb["clear"], ad + 2), "jb clear")
    # C7 /0 with modrm 0x05 = [disp32]
    a.ins(b"\xc7\x05" + _u32(PASS_COUNTER_ADDR) + _u32(0), "mov dword [0x7E00], 0    ; pass counter")
    # the dirtying loop
    a.label("pass")
    a.ins(b"\xb8" + _u32(DIRTY_START), "mov eax, DIRTY_START")
    a.label("dirty")
    a.ins(b"\xfe\x00", "inc byte [eax]           ; first byte of the page")
    a.ins(b"\x05" + _u32(PAGE), "add eax, 0x1000")
    a.ins(b"\x3d" + _u32(DIRTY_END), "cmp eax, DIRTY_END")
    a.dyn(2, lambda lb, ad: b"\x72" + _rel8(lb["dirty"], ad + 2), "jb dirty")
    a.ins(b"\xff\x05" + _u32(PASS_COUNTER_ADDR), "inc dword [0x7E00]       ; one more full pass")
    # marker 'A' + counter % 26 on COM1
    a.ins(b"\xa1" + _u32(PASS_COUNTER_ADDR), "mov eax, [0x7E00]")
    a.ins(b"\x31\xd2", "xor edx, edx")
    a.ins(b"\xb9" + _u32(len(MARKERS)), "mov ecx, 26")
    a.ins(b"\xf7\xf1", "div ecx                  ; edx = counter % 26")
    a.ins(b"\x88\xd0", "mov al, dl")
    a.ins(b"\x04" + bytes([ord("A")]), "add al, 'A'")
    a.ins(b"\x66\xba" + _u16(COM1), "mov dx, 0x3F8            ; COM1 THR")
    a.ins(b"\xee", "out dx, al")
    a.dyn(2, lambda lb, ad: b"\xeb" + _rel8(lb["pass"], ad + 2), "jmp pass")
    # ---------------------------------------------------------------- data
    a.align(8)
    a.label("gdt")
    a.ins(bytes(8), "dq 0                     ; null descriptor")
    # limit 0xFFFFF x 4 KiB (G=1), D=1 (32-bit), base 0; access 0x9A = present ring0 code r/x
    a.ins(bytes.fromhex("ffff0000009acf00"), "code: base 0 limit 4G, 32-bit, exec/read")
    # access 0x92 = present ring0 data r/w
    a.ins(bytes.fromhex("ffff00000092cf00"), "data: base 0 limit 4G, 32-bit, read/write")
    a.label("gdt_desc")
    a.dyn(6, lambda lb, _a: _u16(3 * 8 - 1) + _u32(lb["gdt"]), "dw 23, dd gdt             ; GDTR image")
    return a


def assemble() -> tuple[bytes, list[tuple[int, bytes, str]]]:
    """The 512-byte boot sector and its listing."""
    code, listing = _program().assemble()
    if len(code) > SECTOR - 2:
        raise AssertionError(f"boot code is {len(code)} bytes, more than fits in a sector")
    sector = code + bytes(SECTOR - 2 - len(code)) + b"\x55\xaa"
    return sector, listing


SECTOR_BYTES, LISTING = assemble()


def listing_text() -> str:
    return "\n".join(
        f"{addr:04X}  {code.hex(' '):<30} {text}" if code else f"{addr:04X}  {text}"
        for addr, code, text in LISTING
    )


def build_disk(path: str | os.PathLike[str]) -> Path:
    """Write the bootable raw disk image (sector padded to 1 MiB) to ``path``; return the path."""
    p = Path(path)
    p.write_bytes(SECTOR_BYTES + bytes(DISK_SIZE - SECTOR))
    return p


if __name__ == "__main__":
    print(listing_text())
