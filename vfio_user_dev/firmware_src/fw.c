/*
 * teeio-fw: the (tiny, real) firmware image of the emulated TEE-IO device.
 *
 * It is never executed by the emulator; it exists so that the device's SPDM
 * measurements (DSP0274 1.2 §10.11) are digests of a genuine firmware ELF whose
 * parts can be changed one at a time.  teeio/measurements.py:measure_elf()
 * measures these parts of the linked image:
 *
 *   index 1  code            every SHF_EXECINSTR section (.text)         MUTABLE_FIRMWARE
 *   index 2  configuration   .rodata (fw_config and friends)             FIRMWARE_CONFIG
 *   index 3  version string  .teeio_version, up to its NUL (raw stream)  VERSION
 *   index 4  manifest        .teeio_manifest (struct teeio_fw_manifest)  MEASUREMENT_MANIFEST
 *   index 5  load image      ELF header, program headers, PT_LOAD bytes  MUTABLE_FIRMWARE
 *
 * Build variants (vfio_user_dev/firmware_build.py passes -D flags):
 *   TEEIO_FW_PATCH=1        a "tampered" build whose descriptor CRC check skips the
 *                           length field: one immediate byte in .text changes, nothing else
 *   TEEIO_FW_BUILD_ID="..." the manifest's 16-byte build id (NUL padded)
 *
 * Freestanding: no libc; only the compiler's <stdint.h>/<stddef.h>.
 */
#include <stddef.h>
#include <stdint.h>

#define TEEIO_FW_VERSION_MAJOR 1
#define TEEIO_FW_VERSION_MINOR 0
#define TEEIO_FW_VERSION_PATCH 0
#ifndef TEEIO_FW_PATCH
#define TEEIO_FW_PATCH 0
#endif
#ifndef TEEIO_FW_BUILD_ID
#define TEEIO_FW_BUILD_ID "teeio-fw-dev"
#endif

#define STR_(x) #x
#define STR(x) STR_(x)

/* ---- .teeio_manifest: 28 bytes, little endian, no padding ---------------------------
 *
 *   +0  magic        u32  "TIOM" (0x4D4F4954)
 *   +4  format       u16  manifest format version, 1
 *   +6  reserved     u16  0
 *   +8  fw_version   u32  major << 16 | minor << 8 | patch
 *   +12 build_id     u8[16]  ASCII, NUL padded
 */
struct teeio_fw_manifest {
	uint32_t magic;
	uint16_t format;
	uint16_t reserved;
	uint32_t fw_version;
	uint8_t build_id[16];
};

_Static_assert(sizeof(struct teeio_fw_manifest) == 28, "manifest layout");
_Static_assert(sizeof(TEEIO_FW_BUILD_ID) <= 16, "TEEIO_FW_BUILD_ID is at most 16 bytes");

__attribute__((used, section(".teeio_manifest")))
static const struct teeio_fw_manifest fw_manifest = {
	.magic = 0x4D4F4954u,
	.format = 1,
	.reserved = 0,
	.fw_version = TEEIO_FW_VERSION_MAJOR << 16 | TEEIO_FW_VERSION_MINOR << 8
		      | TEEIO_FW_VERSION_PATCH,
	.build_id = TEEIO_FW_BUILD_ID,
};

/* ---- .teeio_version: a NUL-terminated ASCII string ------------------------------------ */
__attribute__((used, section(".teeio_version")))
static const char fw_version[] = "teeio-fw " STR(TEEIO_FW_VERSION_MAJOR) "."
	STR(TEEIO_FW_VERSION_MINOR) "." STR(TEEIO_FW_VERSION_PATCH);

/* ---- .rodata: the configuration table ------------------------------------------------ */
struct fw_window {
	uint64_t base;
	uint64_t size;
};

struct fw_config {
	uint64_t ring_base;       /* descriptor ring (device-local MMIO) */
	uint32_t ring_entries;    /* power of two */
	uint32_t max_dma_len;     /* longest single transfer */
	uint32_t dma_align;       /* required address alignment, power of two */
	uint32_t n_windows;
	struct fw_window windows[4];  /* guest-physical ranges the TDI may DMA to */
};

const struct fw_config fw_config = {
	.ring_base = 0xFED00000u,
	.ring_entries = 64,
	.max_dma_len = 0x10000,
	.dma_align = 64,
	.n_windows = 2,
	.windows = {
		{ .base = 0x0000000080000000ull, .size = 0x0000000040000000ull },
		{ .base = 0x0000000100000000ull, .size = 0x0000000100000000ull },
	},
};

/* ---- code ---------------------------------------------------------------------------- */

/* One descriptor of the DMA ring as the device's DMA engine reads it. */
struct dma_desc {
	uint64_t addr;
	uint32_t len;
	uint32_t crc;      /* CRC-32 of addr and len (the first 12 bytes) */
	uint32_t status;   /* written back by the firmware */
	uint32_t reserved;
};

#if TEEIO_FW_PATCH
#define DESC_CRC_BYTES 8   /* the tampered build: the CRC no longer covers len */
#else
#define DESC_CRC_BYTES 12
#endif

enum { DESC_PENDING = 0, DESC_OK = 1, DESC_BAD_CRC = 2, DESC_BAD_LEN = 3,
       DESC_BAD_ALIGN = 4, DESC_BAD_WINDOW = 5 };

/* The configuration may be rewritten in flash by the vendor's provisioning tool, so it
 * is read at run time: hide its (known) initialiser from the optimiser. */
static const struct fw_config *config(void)
{
	const struct fw_config *cfg = &fw_config;

	__asm__("" : "+r"(cfg));
	return cfg;
}

/* CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), bitwise: no table needed. */
uint32_t fw_crc32(const volatile uint8_t *p, size_t n)
{
	uint32_t crc = 0xFFFFFFFFu;

	while (n--) {
		crc ^= *p++;
		for (int k = 0; k < 8; k++)
			crc = (crc >> 1) ^ (0xEDB88320u & -(crc & 1u));
	}
	return ~crc;
}

/* Does [addr, addr + len) lie inside one of the configured DMA windows? */
static int in_window(const struct fw_config *cfg, uint64_t addr, uint64_t len)
{
	for (uint32_t i = 0; i < cfg->n_windows && i < 4; i++) {
		const struct fw_window *w = &cfg->windows[i];

		if (addr < w->base)
			continue;
		if (len <= w->size && addr - w->base <= w->size - len)
			return 1;
	}
	return 0;
}

uint32_t fw_dma_check(const volatile struct dma_desc *d)
{
	const struct fw_config *cfg = config();
	uint64_t addr = d->addr;
	uint32_t len = d->len;

	if (fw_crc32((const volatile uint8_t *)d, DESC_CRC_BYTES) != d->crc)
		return DESC_BAD_CRC;
	if (len == 0 || len > cfg->max_dma_len)
		return DESC_BAD_LEN;
	if (addr & (cfg->dma_align - 1))
		return DESC_BAD_ALIGN;
	if (!in_window(cfg, addr, len))
		return DESC_BAD_WINDOW;
	return DESC_OK;
}

/* Main loop: validate each descriptor the host posts and write its status back. */
__attribute__((noreturn)) void fw_main(void)
{
	const struct fw_config *cfg = config();
	volatile struct dma_desc *ring = (volatile struct dma_desc *)(uintptr_t)cfg->ring_base;
	uint32_t head = 0;

	for (;;) {
		volatile struct dma_desc *d = &ring[head & (cfg->ring_entries - 1)];

		if (d->status != DESC_PENDING) {
			__asm__ volatile("pause");
			continue;
		}
		d->status = fw_dma_check(d);
		head++;
	}
}

/* Entry: a stack (top defined by link.ld), then fw_main(), which does not return. */
__asm__(".section .text.entry, \"ax\", @progbits\n"
	".globl _start\n"
	".type _start, @function\n"
	"_start:\n"
	"	lea __stack_top(%rip), %rsp\n"
	"	call fw_main\n"
	"1:	hlt\n"
	"	jmp 1b\n"
	".size _start, . - _start\n"
	".previous\n");
