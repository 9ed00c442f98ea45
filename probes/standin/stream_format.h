/* The stand-in's request-stream file, declared once: probes/standin/standin.c includes this header,
 * and probes/standin/stream.py reads STREAM_MAGIC, STREAM_VERSION and STREAM_REC_BUFFERED from it
 * at import and mirrors the three structs as NumPy dtypes (tests/probes/test_standin_build.py
 * compiles this header and checks every size and offset against them). Little endian; the file is
 * a header, the key table (n_keys keys) and the records (n_recs records, in time order); see
 * stream.py's docstring. */
#ifndef IOTRACE_STREAM_FORMAT_H
#define IOTRACE_STREAM_FORMAT_H

#include <stdint.h>

#define STREAM_MAGIC        "IOTSTRM\0"
#define STREAM_VERSION      1
#define STREAM_REC_BUFFERED 1 /* stream_rec.flags bit 0: a buffered request */

struct stream_header {
    char magic[8];
    uint32_t version, header_size, key_size, rec_size;
    uint32_t n_keys, reserved;
    uint64_t n_recs;
    uint64_t duration_ns; /* time of the last record */
};
struct stream_key { /* a distinct (vcpu, type, dir, addr) */
    uint64_t addr;
    int32_t vcpu; /* -1: buffered */
    uint8_t type, dir;
    uint16_t pad;
};
struct stream_rec {
    uint64_t t_ns;  /* since the stream's start */
    uint64_t data;  /* value written (reads: ignored, the device answers) */
    uint32_t key;   /* index into the key table */
    uint16_t count; /* rep count */
    uint8_t size;   /* bytes per access: 1, 2, 4, 8 */
    uint8_t flags;  /* STREAM_REC_BUFFERED */
};
_Static_assert(sizeof(struct stream_header) == 48, "stream header");
_Static_assert(sizeof(struct stream_key) == 16, "stream key");
_Static_assert(sizeof(struct stream_rec) == 24, "stream record");

#endif
