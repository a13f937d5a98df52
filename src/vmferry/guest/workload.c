/*
 * vmferry guest workload: dirties a working set at a set rate and pattern,
 * writes self-checking blocks to a disk, sends heartbeats on /dev/ttyS1 and
 * verifies every page and every disk block on request.
 *
 * Arguments (key=value, with or without a "vmferry." prefix; read from
 * /proc/cmdline when none are given):
 *   ws=<bytes> rate=<bytes/s> pattern=zero|compressible|random
 *   mode=idle|paced|cpu hz=<heartbeats/s>
 *   disk_dev=<name under /dev> disk_ws=<bytes> disk_rate=<bytes/s>
 *
 * Protocol on /dev/ttyS1 (one line per message, '\n' terminated):
 *   guest -> host: READY pages=<n> pattern=<p> mode=<m> rate=<bytes/s>
 *                        disk_blocks=<n> disk_rate=<bytes/s>   (one line)
 *                  HB <seq> <dirtied_pages_total>
 *                  VERIFY <pages> <bad_pages> <first_bad_page|-1>
 *                         <blocks> <bad_blocks> <first_bad_block|-1>   (one line)
 *                  CORRUPTED <page> | CORRUPTED block <n>
 *                  ACK pause | ACK resume | ACK hz <n>
 *                  ERR <text>
 *   host -> guest: verify | corrupt <page> | corrupt-block <n> | pause |
 *                  resume | ready | hz <n>
 *
 * Heartbeats are best effort (dropped when the channel is full; the sequence
 * number makes drops visible). Replies are queued and retried until sent.
 * "hz <n>" changes the heartbeat rate from the next heartbeat on (the host
 * keeps it low while nothing measures the guest's stalls: each heartbeat costs
 * the host's emulator and agent CPU).
 *
 * Disk: with disk_dev, the first disk_ws bytes of /dev/<disk_dev> (clamped to
 * the device) are the disk region of 4 KiB blocks. Every block is written once
 * (generation 1) before READY; afterwards random runs of blocks are rewritten
 * at disk_rate, each write bumping the blocks' generations. All disk I/O is
 * O_DIRECT: writes reach the virtual device and verify reads the device, never
 * the guest's page cache. The memory side is single-threaded; the disk writer
 * is a thread of its own, so a disk write stalled by the host (a block mirror
 * waiting on the network) never delays heartbeats. disk_lock guards the
 * generation table and is held across each write, each verify and each
 * corrupt-block, so verify always sees whole writes. pause stops the disk
 * writer too.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE_BYTES 4096u
#define PAGE_WORDS (PAGE_SIZE_BYTES / 8u)
#define CHANNEL_PATH "/dev/ttyS1"
#define CPU_CHUNK_PAGES 64u
#define PACED_CHUNK_PAGES 64u
#define OUT_CAPACITY 65536u
#define IN_CAPACITY 512u
#define REPLY_WAIT_MS 2000
/* Large odd prime: k * STRIDE mod n visits every page when gcd(STRIDE, n) = 1. */
#define STRIDE_PRIME 2654435761ull

#define BLOCK_SIZE_BYTES 4096u
#define BLOCK_WORDS (BLOCK_SIZE_BYTES / 8u)
/* Header words: magic, block index, generation, checksum of the rest. */
#define BLOCK_HEADER_WORDS 4u
#define BLOCK_MAGIC 0x31204B5344464D56ull /* "VMFDSK 1" */
/* Fill and verify move 1 MiB per request: few exits, and an aligned O_DIRECT buffer. */
#define DISK_CHUNK_BLOCKS 256u
#define DISK_WAIT_MS 10000u
/* The writer aims at this many writes per second and grows each write (a run of
 * adjacent blocks) up to DISK_MAX_RUN_BLOCKS to reach higher rates. */
#define DISK_WRITES_PER_S 100u
#define DISK_MAX_RUN_BLOCKS 64u
/* At most this much catch-up after the writer was stalled (by the host or a verify). */
#define DISK_MAX_BACKLOG_NS 50000000ull
#define DISK_DEV_MAX 31u

enum pattern { PAT_ZERO, PAT_COMPRESSIBLE, PAT_RANDOM };
enum mode { MODE_IDLE, MODE_PACED, MODE_CPU };

static const char *const pattern_names[] = {"zero", "compressible", "random"};
static const char *const mode_names[] = {"idle", "paced", "cpu"};

struct page_meta {
    uint32_t generation;
    uint64_t checksum;
};

static struct {
    uint64_t ws_bytes;
    uint64_t rate_bps;
    enum pattern pattern;
    enum mode mode;
    uint32_t hz;
    char disk_dev[DISK_DEV_MAX + 1];
    uint64_t disk_ws_bytes;
    uint64_t disk_rate_bps;
} cfg = {64ull << 20, 0, PAT_RANDOM, MODE_IDLE, 200, "", 64ull << 20, 0};

static uint8_t *pages;
static struct page_meta *meta;
static uint64_t n_pages;
static uint64_t stride;
static uint64_t walk_k;
static uint64_t dirtied_total;
static int paused;
static int hz_changed; /* "hz" ran: reschedule the next heartbeat */

/* Disk state. block_gen is written by the writer thread (and by the fill,
 * before the thread starts); every access after that holds disk_lock. */
static int disk_fd = -1;
static uint64_t n_blocks;
static uint32_t *block_gen;
static uint64_t *disk_buf; /* DISK_CHUNK_BLOCKS blocks, main thread only */
static pthread_mutex_t disk_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_int disk_paused;

static int chan = -1;
static char out_buf[OUT_CAPACITY];
static size_t out_len;
static char in_buf[IN_CAPACITY];
static size_t in_len;
static int in_overflow;

/* ---------------------------------------------------------------- time */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------- page contents */

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static uint64_t fmix64(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDull;
    h ^= h >> 33;
    h *= 0xC4CEB9FE1A85EC53ull;
    return h ^ (h >> 33);
}

static void fill_page(uint64_t index, uint32_t generation, uint64_t *w)
{
    uint64_t s = splitmix64((index << 32) ^ generation ^ 0x5EEDull);
    if (s == 0)
        s = 1;
    switch (cfg.pattern) {
    case PAT_ZERO:
        memset(w, 0, PAGE_SIZE_BYTES);
        break;
    case PAT_RANDOM:
        for (unsigned i = 0; i < PAGE_WORDS; i++) {
            /* xorshift64: no multiply, cheap under TCG. */
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            w[i] = s;
        }
        break;
    case PAT_COMPRESSIBLE: {
        /* One byte value repeated, with one random word in eight (~1/8 entropy). */
        uint64_t fill = 0x0101010101010101ull * ((index + generation) & 0xFFu);
        for (unsigned i = 0; i < PAGE_WORDS; i++) {
            if ((i & 7u) == 7u) {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                w[i] = s;
            } else {
                w[i] = fill;
            }
        }
        break;
    }
    }
}

/*
 * Multiply-xor over four independent lanes (each step is a bijection of the
 * lane state, so any single changed word changes the result), then a
 * bijective finaliser mixed with the seed. n_words is a multiple of 4.
 */
static uint64_t lanes_checksum(uint64_t index, const uint64_t *w, unsigned n_words)
{
    const uint64_t k = 0x9FB21C651E98DF25ull;
    uint64_t a = index ^ 0x243F6A8885A308D3ull;
    uint64_t b = index ^ 0x13198A2E03707344ull;
    uint64_t c = index ^ 0xA4093822299F31D0ull;
    uint64_t d = index ^ 0x082EFA98EC4E6C89ull;
    for (unsigned i = 0; i < n_words; i += 4) {
        a = (a ^ w[i]) * k;
        b = (b ^ w[i + 1]) * k;
        c = (c ^ w[i + 2]) * k;
        d = (d ^ w[i + 3]) * k;
        a ^= a >> 29;
        b ^= b >> 29;
        c ^= c >> 29;
        d ^= d >> 29;
    }
    return fmix64(index) ^ fmix64(a) ^ (fmix64(b) + 1) ^ fmix64(c ^ 0x1234567ull) ^
           (fmix64(d) * 3);
}

static uint64_t page_checksum(uint64_t index, const uint64_t *w)
{
    return lanes_checksum(index, w, PAGE_WORDS);
}

static void write_page(uint64_t index)
{
    uint64_t *w = (uint64_t *)(pages + index * PAGE_SIZE_BYTES);
    uint32_t generation = meta[index].generation + 1;
    fill_page(index, generation, w);
    meta[index].generation = generation;
    meta[index].checksum = page_checksum(index, w);
}

static void dirty_pages(uint64_t count)
{
    for (uint64_t i = 0; i < count; i++) {
        write_page((walk_k * stride) % n_pages);
        if (++walk_k == n_pages)
            walk_k = 0;
    }
    dirtied_total += count;
}

/* ------------------------------------------------------ block contents */

/* Covers the body and, through the seed, the block's index and generation. */
static uint64_t block_checksum(uint64_t index, uint32_t generation, const uint64_t *w)
{
    uint64_t seed = splitmix64(index) ^ ((uint64_t)generation * 0x9E3779B97F4A7C15ull);
    return lanes_checksum(seed, w + BLOCK_HEADER_WORDS, BLOCK_WORDS - BLOCK_HEADER_WORDS);
}

static void fill_block(uint64_t index, uint32_t generation, uint64_t *w)
{
    uint64_t s = splitmix64((index << 32) ^ generation ^ 0xD15Cull);
    if (s == 0)
        s = 1;
    for (unsigned i = BLOCK_HEADER_WORDS; i < BLOCK_WORDS; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        w[i] = s;
    }
    w[0] = BLOCK_MAGIC;
    w[1] = index;
    w[2] = generation;
    w[3] = block_checksum(index, generation, w);
}

static int block_is_good(uint64_t index, uint32_t generation, const uint64_t *w)
{
    return w[0] == BLOCK_MAGIC && w[1] == index && w[2] == generation &&
           w[3] == block_checksum(index, generation, w);
}

/* ---------------------------------------------------------------- disk */

/* Whole-buffer O_DIRECT transfer; 0 on success, -1 with errno set. */
static int disk_io(int write_it, void *buf, size_t len, uint64_t offset)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = write_it ? pwrite(disk_fd, (char *)buf + done, len - done, (off_t)(offset + done))
                             : pread(disk_fd, (char *)buf + done, len - done, (off_t)(offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            if (n == 0)
                errno = EIO; /* past the end of the device */
            return -1;
        }
        done += (size_t)n;
    }
    return 0;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = {(time_t)(ms / 1000u), (long)(ms % 1000u) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Open /dev/<disk_dev> (waiting for the driver's asynchronous probe), size the
 * region and write every block of it once. Exits on failure: a VM that was
 * given a disk must not look healthy without one. */
static void setup_disk(void)
{
    char path[16 + DISK_DEV_MAX];
    snprintf(path, sizeof path, "/dev/%s", cfg.disk_dev);
    uint64_t t0 = now_ns();
    uint64_t deadline = t0 + (uint64_t)DISK_WAIT_MS * 1000000ull;
    for (;;) {
        disk_fd = open(path, O_RDWR | O_DIRECT | O_CLOEXEC);
        if (disk_fd >= 0)
            break;
        int retry = errno == ENOENT || errno == ENXIO || errno == ENODEV;
        if (!retry || now_ns() > deadline) {
            fprintf(stderr, "workload: open %s: %s (waited %" PRIu64 " ms)\n", path,
                    strerror(errno), (uint64_t)((now_ns() - t0) / 1000000ull));
            exit(1);
        }
        sleep_ms(20);
    }
    uint64_t device_bytes = 0;
    if (ioctl(disk_fd, BLKGETSIZE64, &device_bytes) != 0) {
        fprintf(stderr, "workload: BLKGETSIZE64 %s: %s\n", path, strerror(errno));
        exit(1);
    }
    uint64_t region = cfg.disk_ws_bytes < device_bytes ? cfg.disk_ws_bytes : device_bytes;
    n_blocks = region / BLOCK_SIZE_BYTES;
    if (n_blocks == 0) {
        fprintf(stderr, "workload: %s holds no whole 4 KiB block\n", path);
        exit(1);
    }
    block_gen = calloc(n_blocks, sizeof *block_gen);
    disk_buf = aligned_alloc(BLOCK_SIZE_BYTES, (size_t)DISK_CHUNK_BLOCKS * BLOCK_SIZE_BYTES);
    if (block_gen == NULL || disk_buf == NULL) {
        fprintf(stderr, "workload: no memory for %" PRIu64 " disk blocks\n", n_blocks);
        exit(1);
    }
    uint64_t t1 = now_ns();
    for (uint64_t first = 0; first < n_blocks; first += DISK_CHUNK_BLOCKS) {
        uint64_t count = n_blocks - first < DISK_CHUNK_BLOCKS ? n_blocks - first : DISK_CHUNK_BLOCKS;
        for (uint64_t i = 0; i < count; i++)
            fill_block(first + i, 1, disk_buf + i * BLOCK_WORDS);
        if (disk_io(1, disk_buf, (size_t)(count * BLOCK_SIZE_BYTES), first * BLOCK_SIZE_BYTES) != 0) {
            fprintf(stderr, "workload: writing %s block %" PRIu64 ": %s\n", path, first,
                    strerror(errno));
            exit(1);
        }
        for (uint64_t i = 0; i < count; i++)
            block_gen[first + i] = 1;
    }
    fprintf(stderr,
            "workload: %s (%" PRIu64 " bytes) appeared after %" PRIu64 " ms; filled %" PRIu64
            " blocks in %" PRIu64 " ms\n",
            path, device_bytes, (uint64_t)((t1 - t0) / 1000000ull), n_blocks,
            (uint64_t)((now_ns() - t1) / 1000000ull));
}

static void *disk_writer(void *unused)
{
    (void)unused;
    uint64_t run = cfg.disk_rate_bps / BLOCK_SIZE_BYTES / DISK_WRITES_PER_S;
    if (run < 1)
        run = 1;
    if (run > DISK_MAX_RUN_BLOCKS)
        run = DISK_MAX_RUN_BLOCKS;
    if (run > n_blocks)
        run = n_blocks;
    uint64_t *buf = aligned_alloc(BLOCK_SIZE_BYTES, (size_t)(run * BLOCK_SIZE_BYTES));
    if (buf == NULL) {
        fprintf(stderr, "workload: disk writer: no memory\n");
        return NULL;
    }
    const uint64_t period_ns = run * BLOCK_SIZE_BYTES * 1000000000ull / cfg.disk_rate_bps;
    uint64_t rng = splitmix64(now_ns()) | 1;
    uint64_t errors = 0;
    uint64_t next = now_ns();
    for (;;) {
        struct timespec ts = {(time_t)(next / 1000000000ull), (long)(next % 1000000000ull)};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
            ;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        uint64_t first = rng % (n_blocks - run + 1);

        pthread_mutex_lock(&disk_lock);
        /* Checked under the lock: after "ACK pause" no write can land on a
         * block that corrupt-block damages next. */
        if (!atomic_load(&disk_paused)) {
            for (uint64_t i = 0; i < run; i++)
                fill_block(first + i, block_gen[first + i] + 1, buf + i * BLOCK_WORDS);
            if (disk_io(1, buf, (size_t)(run * BLOCK_SIZE_BYTES), first * BLOCK_SIZE_BYTES) == 0) {
                for (uint64_t i = 0; i < run; i++)
                    block_gen[first + i]++;
            } else if (errors++ < 10) {
                /* The blocks' contents are now unknown: verify will say so. */
                fprintf(stderr, "workload: disk write at block %" PRIu64 ": %s\n", first,
                        strerror(errno));
            }
        }
        pthread_mutex_unlock(&disk_lock);

        next += period_ns;
        uint64_t now = now_ns();
        if (next + DISK_MAX_BACKLOG_NS < now)
            next = now - DISK_MAX_BACKLOG_NS;
    }
    return NULL;
}

static void start_disk_writer(void)
{
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int err = pthread_create(&thread, &attr, disk_writer, NULL);
    pthread_attr_destroy(&attr);
    if (err != 0) {
        fprintf(stderr, "workload: starting the disk writer: %s\n", strerror(err));
        exit(1);
    }
}

/* ------------------------------------------------------------- channel */

static void open_channel(void)
{
    struct termios t;
    /* VMFERRY_CHANNEL lets the program run on a host pty for debugging. */
    const char *path = getenv("VMFERRY_CHANNEL");
    if (path == NULL || path[0] == '\0')
        path = CHANNEL_PATH;
    chan = open(path, O_RDWR | O_NONBLOCK | O_NOCTTY);
    if (chan < 0) {
        fprintf(stderr, "workload: open %s: %s\n", path, strerror(errno));
        exit(1);
    }
    if (tcgetattr(chan, &t) == 0) {
        cfmakeraw(&t);
        cfsetispeed(&t, B115200);
        cfsetospeed(&t, B115200);
        t.c_cflag |= CLOCAL | CREAD;
        if (tcsetattr(chan, TCSANOW, &t) != 0)
            fprintf(stderr, "workload: tcsetattr: %s\n", strerror(errno));
    } else {
        fprintf(stderr, "workload: tcgetattr: %s\n", strerror(errno));
    }
}

/* Write as much of the queue as the tty takes now. Returns 0, or -1 on a hard error. */
static int flush_out(void)
{
    while (out_len > 0) {
        ssize_t n = write(chan, out_buf, out_len);
        if (n > 0) {
            memmove(out_buf, out_buf + n, out_len - (size_t)n);
            out_len -= (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            return -1;
        } else {
            return 0;
        }
    }
    return 0;
}

/* Queue a reply and keep writing (bounded wait for POLLOUT) until it is out.
 * Whatever is still queued after the wait is flushed by the main loop. */
static void reply(const char *fmt, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (len < 0)
        return;
    if ((size_t)len >= sizeof line)
        len = (int)sizeof line - 1;

    uint64_t deadline = now_ns() + (uint64_t)REPLY_WAIT_MS * 1000000ull;
    while (out_len + (size_t)len > OUT_CAPACITY) {
        struct pollfd p = {chan, POLLOUT, 0};
        flush_out();
        if (now_ns() > deadline)
            return; /* queue jammed for seconds: nobody is listening */
        poll(&p, 1, 10);
    }
    memcpy(out_buf + out_len, line, (size_t)len);
    out_len += (size_t)len;

    while (out_len > 0) {
        if (flush_out() < 0 || out_len == 0)
            return;
        uint64_t now = now_ns();
        if (now >= deadline)
            return;
        struct pollfd p = {chan, POLLOUT, 0};
        int wait_ms = (int)((deadline - now) / 1000000ull) + 1;
        poll(&p, 1, wait_ms > 50 ? 50 : wait_ms);
    }
}

/* Best effort: dropped when anything is still queued or the tty is full,
 * never torn (a partial write is queued to finish the line). */
static void heartbeat(uint64_t seq)
{
    char line[64];
    int len = snprintf(line, sizeof line, "HB %" PRIu64 " %" PRIu64 "\n", seq, dirtied_total);
    flush_out();
    if (out_len > 0 || len <= 0)
        return;
    ssize_t n = write(chan, line, (size_t)len);
    if (n > 0 && n < len) {
        memcpy(out_buf, line + n, (size_t)(len - n));
        out_len = (size_t)(len - n);
    }
}

static void announce_ready(void)
{
    reply("READY pages=%" PRIu64 " pattern=%s mode=%s rate=%" PRIu64 " disk_blocks=%" PRIu64
          " disk_rate=%" PRIu64 "\n",
          n_pages, pattern_names[cfg.pattern], mode_names[cfg.mode], cfg.rate_bps, n_blocks,
          n_blocks > 0 ? cfg.disk_rate_bps : 0);
}

/* ------------------------------------------------------------ commands */

/* Read the whole disk region back from the device; unreadable blocks are bad. */
static void verify_disk(uint64_t *bad, int64_t *first_bad)
{
    pthread_mutex_lock(&disk_lock);
    for (uint64_t first = 0; first < n_blocks; first += DISK_CHUNK_BLOCKS) {
        uint64_t count = n_blocks - first < DISK_CHUNK_BLOCKS ? n_blocks - first : DISK_CHUNK_BLOCKS;
        int readable =
            disk_io(0, disk_buf, (size_t)(count * BLOCK_SIZE_BYTES), first * BLOCK_SIZE_BYTES) == 0;
        if (!readable)
            fprintf(stderr, "workload: verify: reading block %" PRIu64 ": %s\n", first,
                    strerror(errno));
        for (uint64_t i = 0; i < count; i++) {
            uint64_t index = first + i;
            if (readable && block_is_good(index, block_gen[index], disk_buf + i * BLOCK_WORDS))
                continue;
            if (*bad == 0)
                *first_bad = (int64_t)index;
            (*bad)++;
        }
    }
    pthread_mutex_unlock(&disk_lock);
}

static void do_verify(void)
{
    uint64_t bad = 0;
    int64_t first_bad = -1;
    for (uint64_t i = 0; i < n_pages; i++) {
        const uint64_t *w = (const uint64_t *)(pages + i * PAGE_SIZE_BYTES);
        if (page_checksum(i, w) != meta[i].checksum) {
            if (bad == 0)
                first_bad = (int64_t)i;
            bad++;
        }
    }
    uint64_t bad_blocks = 0;
    int64_t first_bad_block = -1;
    if (n_blocks > 0)
        verify_disk(&bad_blocks, &first_bad_block);
    reply("VERIFY %" PRIu64 " %" PRIu64 " %" PRId64 " %" PRIu64 " %" PRIu64 " %" PRId64 "\n",
          n_pages, bad, first_bad, n_blocks, bad_blocks, first_bad_block);
}

static void do_corrupt(const char *arg)
{
    char *end;
    errno = 0;
    unsigned long long page = strtoull(arg, &end, 10);
    if (errno != 0 || end == arg || *end != '\0' || arg[0] == '-' || page >= n_pages) {
        reply("ERR corrupt: bad page '%.64s' (have %" PRIu64 " pages)\n", arg, n_pages);
        return;
    }
    /* Flip bytes without touching the table, as a broken migration would. */
    uint8_t *p = pages + page * PAGE_SIZE_BYTES;
    p[0] ^= 0xA5;
    p[1031] ^= 0x5A;
    p[PAGE_SIZE_BYTES - 1] ^= 0xFF;
    reply("CORRUPTED %llu\n", page);
}

static void do_corrupt_block(const char *arg)
{
    char *end;
    errno = 0;
    unsigned long long block = strtoull(arg, &end, 10);
    if (errno != 0 || end == arg || *end != '\0' || arg[0] == '-' || block >= n_blocks) {
        reply("ERR corrupt-block: bad block '%.64s' (have %" PRIu64 " blocks)\n", arg, n_blocks);
        return;
    }
    /* Flip bytes of the block on the device, leaving the generation table alone. */
    pthread_mutex_lock(&disk_lock);
    uint8_t *p = (uint8_t *)disk_buf;
    uint64_t offset = (uint64_t)block * BLOCK_SIZE_BYTES;
    int failed = disk_io(0, disk_buf, BLOCK_SIZE_BYTES, offset);
    if (failed == 0) {
        p[100] ^= 0xA5;
        p[2049] ^= 0x5A;
        p[BLOCK_SIZE_BYTES - 1] ^= 0xFF;
        failed = disk_io(1, disk_buf, BLOCK_SIZE_BYTES, offset);
    }
    int saved = errno;
    pthread_mutex_unlock(&disk_lock);
    if (failed)
        reply("ERR corrupt-block %llu: %s\n", block, strerror(saved));
    else
        reply("CORRUPTED block %llu\n", block);
}

static int parse_u64(const char *text, uint64_t *out);

static void handle_command(char *line)
{
    while (*line == ' ' || *line == '\t')
        line++;
    size_t len = strlen(line);
    while (len > 0 && (line[len - 1] == ' ' || line[len - 1] == '\t'))
        line[--len] = '\0';
    if (len == 0)
        return;
    if (strcmp(line, "verify") == 0) {
        do_verify();
    } else if (strncmp(line, "corrupt ", 8) == 0) {
        const char *arg = line + 8;
        while (*arg == ' ')
            arg++;
        do_corrupt(arg);
    } else if (strncmp(line, "corrupt-block ", 14) == 0) {
        const char *arg = line + 14;
        while (*arg == ' ')
            arg++;
        do_corrupt_block(arg);
    } else if (strcmp(line, "pause") == 0) {
        paused = 1;
        atomic_store(&disk_paused, 1);
        reply("ACK pause\n");
    } else if (strcmp(line, "resume") == 0) {
        paused = 0;
        atomic_store(&disk_paused, 0);
        reply("ACK resume\n");
    } else if (strcmp(line, "ready") == 0) {
        announce_ready();
    } else if (strncmp(line, "hz ", 3) == 0) {
        uint64_t v;
        if (parse_u64(line + 3, &v) != 0 || v == 0 || v > 10000) {
            reply("ERR hz wants 1..10000, got '%.32s'\n", line + 3);
        } else {
            cfg.hz = (uint32_t)v;
            hz_changed = 1;
            reply("ACK hz %llu\n", (unsigned long long)v);
        }
    } else {
        reply("ERR unknown command '%.64s'\n", line);
    }
}

/* Returns 1 when at least one command ran (timing must be resynchronised). */
static int poll_commands(void)
{
    int ran = 0;
    for (;;) {
        ssize_t n = read(chan, in_buf + in_len, IN_CAPACITY - in_len);
        if (n <= 0)
            break;
        in_len += (size_t)n;
        size_t start = 0;
        for (size_t i = 0; i < in_len; i++) {
            if (in_buf[i] != '\n' && in_buf[i] != '\r')
                continue;
            in_buf[i] = '\0';
            if (!in_overflow) {
                handle_command(in_buf + start);
                ran = 1;
            }
            in_overflow = 0;
            start = i + 1;
        }
        memmove(in_buf, in_buf + start, in_len - start);
        in_len -= start;
        if (in_len == IN_CAPACITY) { /* overlong line: discard it up to its newline */
            in_len = 0;
            in_overflow = 1;
        }
    }
    return ran;
}

/* ------------------------------------------------------------ arguments */

static int parse_u64(const char *text, uint64_t *out)
{
    char *end;
    errno = 0;
    if (text[0] == '-' || text[0] == '\0')
        return -1;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno != 0 || *end != '\0')
        return -1;
    *out = v;
    return 0;
}

static void parse_arg(const char *arg)
{
    uint64_t v;
    if (strncmp(arg, "vmferry.", 8) == 0)
        arg += 8;
    const char *eq = strchr(arg, '=');
    if (eq == NULL)
        goto bad;
    const char *val = eq + 1;
    size_t klen = (size_t)(eq - arg);
    if (klen == 2 && strncmp(arg, "ws", 2) == 0) {
        if (parse_u64(val, &v) != 0 || v < PAGE_SIZE_BYTES)
            goto bad;
        cfg.ws_bytes = v;
    } else if (klen == 4 && strncmp(arg, "rate", 4) == 0) {
        if (parse_u64(val, &v) != 0)
            goto bad;
        cfg.rate_bps = v;
    } else if (klen == 2 && strncmp(arg, "hz", 2) == 0) {
        if (parse_u64(val, &v) != 0 || v == 0 || v > 10000)
            goto bad;
        cfg.hz = (uint32_t)v;
    } else if (klen == 7 && strncmp(arg, "pattern", 7) == 0) {
        for (int i = 0; i < 3; i++)
            if (strcmp(val, pattern_names[i]) == 0) {
                cfg.pattern = (enum pattern)i;
                return;
            }
        goto bad;
    } else if (klen == 4 && strncmp(arg, "mode", 4) == 0) {
        for (int i = 0; i < 3; i++)
            if (strcmp(val, mode_names[i]) == 0) {
                cfg.mode = (enum mode)i;
                return;
            }
        goto bad;
    } else if (klen == 8 && strncmp(arg, "disk_dev", 8) == 0) {
        /* A plain device name: it is put after "/dev/". */
        size_t n = strlen(val);
        if (n == 0 || n > DISK_DEV_MAX || strspn(val, "abcdefghijklmnopqrstuvwxyz0123456789") != n)
            goto bad;
        memcpy(cfg.disk_dev, val, n + 1);
    } else if (klen == 7 && strncmp(arg, "disk_ws", 7) == 0) {
        if (parse_u64(val, &v) != 0 || v < BLOCK_SIZE_BYTES)
            goto bad;
        cfg.disk_ws_bytes = v;
    } else if (klen == 9 && strncmp(arg, "disk_rate", 9) == 0) {
        if (parse_u64(val, &v) != 0)
            goto bad;
        cfg.disk_rate_bps = v;
    } else {
        goto bad;
    }
    return;
bad:
    fprintf(stderr, "workload: ignoring bad argument '%s'\n", arg);
}

static void parse_proc_cmdline(void)
{
    char buf[4096];
    FILE *f = fopen("/proc/cmdline", "r");
    if (f == NULL)
        return;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    for (char *save = NULL, *tok = strtok_r(buf, " \t\n", &save); tok != NULL;
         tok = strtok_r(NULL, " \t\n", &save))
        if (strncmp(tok, "vmferry.", 8) == 0)
            parse_arg(tok);
}

/* ----------------------------------------------------------------- main */

static void sleep_until(uint64_t deadline_ns, int want_out)
{
    uint64_t now = now_ns();
    if (deadline_ns <= now)
        return;
    uint64_t wait = deadline_ns - now;
    struct timespec ts = {(time_t)(wait / 1000000000ull), (long)(wait % 1000000000ull)};
    struct pollfd p = {chan, (short)(POLLIN | (want_out ? POLLOUT : 0)), 0};
    ppoll(&p, 1, &ts, NULL);
}

int main(int argc, char **argv)
{
    if (argc > 1)
        for (int i = 1; i < argc; i++)
            parse_arg(argv[i]);
    else
        parse_proc_cmdline();
    if (cfg.mode == MODE_CPU)
        cfg.rate_bps = 0; /* unpaced: the rate is whatever the CPU achieves */
    if (cfg.mode == MODE_PACED && cfg.rate_bps == 0)
        cfg.mode = MODE_IDLE;
    signal(SIGPIPE, SIG_IGN);

    n_pages = cfg.ws_bytes / PAGE_SIZE_BYTES;
    stride = (n_pages % STRIDE_PRIME == 0) ? 1 : STRIDE_PRIME % n_pages;
    if (stride == 0)
        stride = 1;

    pages = mmap(NULL, n_pages * PAGE_SIZE_BYTES, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    meta = mmap(NULL, n_pages * sizeof *meta, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (pages == MAP_FAILED || meta == MAP_FAILED) {
        fprintf(stderr, "workload: mmap %" PRIu64 " pages: %s\n", n_pages, strerror(errno));
        return 1;
    }
    if (mlock(pages, n_pages * PAGE_SIZE_BYTES) != 0)
        fprintf(stderr, "workload: mlock: %s (continuing)\n", strerror(errno));

    open_channel();

    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < n_pages; i++)
        write_page(i);
    fprintf(stderr, "workload: filled %" PRIu64 " pages in %" PRIu64 " ms\n", n_pages,
            (uint64_t)((now_ns() - t0) / 1000000ull));
    if (cfg.disk_dev[0] != '\0') {
        setup_disk();
        if (cfg.disk_rate_bps > 0)
            start_disk_writer();
    }
    announce_ready();

    uint64_t period_ns = 1000000000ull / cfg.hz;
    /* Token bucket for paced mode: at most ~50 ms of burst after a stall. */
    const double bucket_max = (double)cfg.rate_bps / 20.0 + (double)PAGE_SIZE_BYTES * PACED_CHUNK_PAGES;
    double tokens = 0.0;
    uint64_t seq = 0;
    uint64_t last_refill = now_ns();
    uint64_t next_hb = last_refill + period_ns;

    for (;;) {
        uint64_t now = now_ns();
        if (now >= next_hb) {
            heartbeat(++seq);
            next_hb += period_ns;
            if (next_hb <= now) /* fell behind by more than a period: resync */
                next_hb = now + period_ns;
        }
        if (poll_commands()) {
            now = now_ns();
            if (hz_changed) { /* the new rate from the next heartbeat on */
                hz_changed = 0;
                period_ns = 1000000000ull / cfg.hz;
                next_hb = now + period_ns;
            }
            if (next_hb <= now)
                next_hb = now + period_ns;
            last_refill = now; /* no catch-up burst for time spent in a command */
        }
        if (out_len > 0)
            flush_out();

        int dirtying = !paused && cfg.mode != MODE_IDLE;
        if (dirtying && cfg.mode == MODE_CPU) {
            dirty_pages(CPU_CHUNK_PAGES);
            continue;
        }
        if (dirtying && cfg.mode == MODE_PACED) {
            now = now_ns();
            tokens += (double)(now - last_refill) * (double)cfg.rate_bps / 1e9;
            last_refill = now;
            if (tokens > bucket_max)
                tokens = bucket_max;
            uint64_t can = (uint64_t)(tokens / PAGE_SIZE_BYTES);
            if (can > 0) {
                if (can > PACED_CHUNK_PAGES)
                    can = PACED_CHUNK_PAGES;
                dirty_pages(can);
                tokens -= (double)(can * PAGE_SIZE_BYTES);
                continue;
            }
            /* Sleep until a whole chunk's worth of tokens (or the next heartbeat):
             * waking per page would cost ~10k wakeups/s at 50 MB/s, which under TCG
             * eats a whole host core. */
            double want = (double)PAGE_SIZE_BYTES * PACED_CHUNK_PAGES;
            uint64_t need_ns = (uint64_t)((want - tokens) * 1e9 / (double)cfg.rate_bps) + 1;
            uint64_t wake = now + need_ns;
            sleep_until(wake < next_hb ? wake : next_hb, out_len > 0);
            continue;
        }
        if (!dirtying)
            last_refill = now_ns();
        sleep_until(next_hb, out_len > 0);
    }
}
