/* xtwalk.c - the one sequential step of xentrace decoding: finding record boundaries.
 *
 * A xentrace file (tools/xentrace/xentrace.c) is a series of windows: a cpu_change record
 * (header 0x2001f003 = TRC_TRACE_CPU_CHANGE with 2 extra words, then s32 cpu, u32 window bytes),
 * followed by that many bytes of the pCPU's records.  Each record (struct t_rec,
 * xen/include/public/trace.h) is a u32 header - event in bits 0-27, extra word count in bits
 * 28-30, TSC present in bit 31 - then 2 TSC words if bit 31 is set, then the extra words.
 * A record's length is only known from its header, so boundaries must be walked one by one;
 * everything else (fields, attribution, service times) is done column-wise in NumPy by
 * decoder.py, which also has a pure-NumPy fallback for this walk.
 *
 * Built by the Makefile into _xtwalk.so and loaded with ctypes.
 */
#include <stdint.h>

#define CPU_CHANGE_HEADER 0x2001f003u

enum {
    ST_REMAIN = 0,   /* words left in the current window (0: a cpu_change header comes next) */
    ST_CPU = 1,      /* pCPU of the current window */
    ST_POS = 2,      /* in/out: word index to continue from */
    ST_STATUS = 3,   /* out: why the walk stopped */
    ST_ERRORS = 4,   /* in/out: records that ran past their window's end */
    ST_SKIP = 5,     /* 1 while skipping the rest of a window after such a record */
    ST_WINDOWS = 6,  /* in/out: windows seen */
    ST_WOUT = 7,     /* out: windows started in this call (entries written to win_first/cpu) */
};

enum {
    XT_END = 0,        /* all words consumed: nothing left over */
    XT_PARTIAL = 1,    /* stopped before an incomplete header/record at ST_POS: feed more */
    XT_FULL = 2,       /* output arrays full: call again */
    XT_BAD_WINDOW = 3, /* no cpu_change header (or a bad one) where a window must start */
};

/* Walk from st[ST_POS]; write each complete record's word offset and pCPU, and for each window
 * started, the index (in rec_off) of its first record and its pCPU. Returns the record count. */
int64_t xt_walk(const uint32_t *w, int64_t n, int64_t *rec_off, int32_t *rec_cpu, int64_t cap,
                int64_t *win_first, int32_t *win_cpu, int64_t wcap, int64_t *st)
{
    int64_t pos = st[ST_POS], remain = st[ST_REMAIN], count = 0, wcount = 0;
    int32_t cpu = (int32_t)st[ST_CPU];

    st[ST_STATUS] = XT_END;
    while (pos < n) {
        if (st[ST_SKIP]) {
            int64_t take = remain < n - pos ? remain : n - pos;
            pos += take;
            remain -= take;
            if (remain == 0)
                st[ST_SKIP] = 0;
            continue;
        }
        if (remain == 0) {
            uint32_t bytes;
            if (pos + 3 > n) {
                st[ST_STATUS] = XT_PARTIAL;
                break;
            }
            bytes = w[pos + 2];
            if (w[pos] != CPU_CHANGE_HEADER || (bytes & 3u)) {
                st[ST_STATUS] = XT_BAD_WINDOW;
                break;
            }
            if (wcount == wcap) {
                st[ST_STATUS] = XT_FULL;
                break;
            }
            cpu = (int32_t)w[pos + 1];
            remain = bytes >> 2;
            pos += 3;
            st[ST_WINDOWS]++;
            win_first[wcount] = count;
            win_cpu[wcount] = cpu;
            wcount++;
            continue;
        }
        {
            uint32_t h = w[pos];
            int64_t len = 1 + ((h >> 28) & 7u) + ((h >> 31) << 1);
            if (len > remain) {
                /* The record claims more words than its window holds: count it, drop the
                 * rest of the window, resynchronise on the next cpu_change header. */
                st[ST_ERRORS]++;
                st[ST_SKIP] = 1;
                continue;
            }
            if (pos + len > n) {
                st[ST_STATUS] = XT_PARTIAL;
                break;
            }
            if (count == cap) {
                st[ST_STATUS] = XT_FULL;
                break;
            }
            rec_off[count] = pos;
            rec_cpu[count] = cpu;
            count++;
            pos += len;
            remain -= len;
        }
    }
    st[ST_POS] = pos;
    st[ST_REMAIN] = remain;
    st[ST_CPU] = cpu;
    st[ST_WOUT] = wcount;
    return count;
}
