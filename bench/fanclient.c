/* fanclient: the one client program of the fan-out bench, for every server (iotd, the
 * `websockets` broadcast server, Mosquitto).
 *
 * N websocket or MQTT (3.1.1, QoS 0) subscriber connections on one epoll loop, in C so that the
 * client is never what limits a measurement (bench/fanout.py reports its CPU use).  Every byte
 * received is scanned for `"ts":<seconds>` -- the send time the ingester put into each event's
 * payload -- and `now - ts` is recorded per event: the same parse for a websocket frame and an
 * MQTT PUBLISH, no framing needed (a frame header never contains that text).
 *
 *   fanclient ws|mqtt HOST PORT N SPREAD TEMPLATE
 *
 * TEMPLATE is the request path (ws) or the topic (mqtt), with %d replaced by i % SPREAD.
 * Commands on stdin, one per line: reset | report | tick | quit.  Output lines:
 *   ready OPEN FAILED                      all handshakes done
 *   count NOW EVENTS OPEN LAST             (tick)
 *   report {"open":..,"events":..,"first":..,"last":..,"p50":..,"p99":..,"max":..,"lost":..}
 * Times are wall-clock seconds (the ingester's clock is the same machine's), latencies ms.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { CONNECTING, HANDSHAKE, OPEN, CLOSED };
#define TAIL 64
#define RBUF (1 << 18)
#define MAX_INFLIGHT 100 /* handshakes at once (listen backlogs) */

typedef struct {
    int fd, state, id;
    char hs[4096];
    int hslen;
    char tail[TAIL];
    int taillen;
} conn_t;

static int mqtt, n, spread, port, opened, failed, lost, inflight, next_conn;
static const char *host, *tmpl;
static conn_t *conns;
static int ep;
static double *lat;
static size_t nlat, caplat;
static long long events;
static double first_t, last_t;
static char rbuf[TAIL + RBUF];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void record(double ms, double t) {
    if (nlat == caplat) {
        caplat = caplat ? caplat * 2 : 1 << 20;
        lat = realloc(lat, caplat * sizeof(double));
        if (!lat) { perror("realloc"); exit(1); }
    }
    lat[nlat++] = ms;
    events++;
    if (first_t == 0) first_t = t;
    last_t = t;
}

/* Scan p[0..len) for "ts":<number>; returns how many bytes at the end to keep (an incomplete match). */
static int scan(const char *p, int len, double t) {
    const char *end = p + len, *at = p;
    for (;;) {
        const char *m = memmem(at, end - at, "\"ts\":", 5);
        if (!m) break;
        const char *q = m + 5;
        while (q < end && *q == ' ') q++;
        long long ip = 0, fp = 0, scale = 1;
        int digits = 0, frac = 0, done = 0;
        while (q < end) {
            char c = *q;
            if (c >= '0' && c <= '9') {
                if (frac) { if (scale < 1000000000000LL) { fp = fp * 10 + (c - '0'); scale *= 10; } }
                else ip = ip * 10 + (c - '0');
                digits++;
            } else if (c == '.' && !frac) frac = 1;
            else { done = 1; break; }
            q++;
        }
        if (!done) return (int)(end - m); /* cut at the chunk's end: keep it for the next read */
        if (digits) record((t - ((double)ip + (double)fp / (double)scale)) * 1000.0, t);
        at = q;
    }
    int keep = len < TAIL - 1 ? len : TAIL - 1;
    return keep > 4 ? 4 : keep; /* a split `"ts"` marker needs at most 4 bytes of context */
}

static void watch(conn_t *c, uint32_t evs, int op) {
    struct epoll_event e = {.events = evs, .data.ptr = c};
    epoll_ctl(ep, op, c->fd, &e);
}

static void start_one(void) {
    conn_t *c = &conns[next_conn];
    c->id = next_conn++;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    connect(c->fd, (struct sockaddr *)&a, sizeof a);
    c->state = CONNECTING;
    inflight++;
    watch(c, EPOLLOUT | EPOLLIN, EPOLL_CTL_ADD);
}

static void fill(void) {
    while (inflight < MAX_INFLIGHT && next_conn < n) start_one();
}

static void close_conn(conn_t *c) {
    if (c->state == CLOSED) return;
    if (c->state == OPEN) { opened--; lost++; }
    else { inflight--; failed++; }
    c->state = CLOSED;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
}

static int put_str(unsigned char *b, const char *s) {
    int l = strlen(s);
    b[0] = l >> 8; b[1] = l & 0xff;
    memcpy(b + 2, s, l);
    return l + 2;
}

static int put_len(unsigned char *b, int len) {
    int i = 0;
    do { unsigned char d = len % 128; len /= 128; if (len) d |= 128; b[i++] = d; } while (len);
    return i;
}

static void send_handshake(conn_t *c) {
    char target[1024];
    snprintf(target, sizeof target, tmpl, c->id % spread);
    if (!mqtt) {
        char req[2048];
        int l = snprintf(req, sizeof req,
                         "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                         target, host, port);
        write(c->fd, req, l);
    } else {
        unsigned char pkt[2048], body[1024];
        char cid[64];
        snprintf(cid, sizeof cid, "fan%d-%d", (int)getpid(), c->id);
        int bl = 0;
        bl += put_str(body + bl, "MQTT");
        body[bl++] = 4;    /* 3.1.1 */
        body[bl++] = 0x02; /* clean session */
        body[bl++] = 0; body[bl++] = 0; /* no keep-alive */
        bl += put_str(body + bl, cid);
        int pl = 0;
        pkt[pl++] = 0x10;
        pl += put_len(pkt + pl, bl);
        memcpy(pkt + pl, body, bl); pl += bl;
        bl = 0;
        body[bl++] = 0; body[bl++] = 1; /* packet id */
        bl += put_str(body + bl, target);
        body[bl++] = 0; /* QoS 0 */
        pkt[pl++] = 0x82;
        pl += put_len(pkt + pl, bl);
        memcpy(pkt + pl, body, bl); pl += bl;
        write(c->fd, pkt, pl);
    }
    c->state = HANDSHAKE;
    c->hslen = 0;
}

static void became_open(conn_t *c, const char *rest, int restlen, double t) {
    c->state = OPEN;
    inflight--;
    opened++;
    if (restlen > 0) {
        int keep = scan(rest, restlen, t);
        memcpy(c->tail, rest + restlen - keep, keep);
        c->taillen = keep;
    }
}

/* The handshake bytes so far: is it done? */
static void handshake_data(conn_t *c, double t) {
    if (!mqtt) {
        char *e = memmem(c->hs, c->hslen, "\r\n\r\n", 4);
        if (!e) return;
        if (!memmem(c->hs, e - c->hs, " 101 ", 5)) { close_conn(c); return; }
        char *rest = e + 4;
        became_open(c, rest, c->hs + c->hslen - rest, t);
        return;
    }
    unsigned char *b = (unsigned char *)c->hs;
    int at = 0;
    while (at < c->hslen) {
        int mult = 1, len = 0, i = at + 1;
        for (;;) {
            if (i >= c->hslen) return;
            len += (b[i] & 127) * mult;
            mult *= 128;
            if (!(b[i++] & 128)) break;
        }
        if (i + len > c->hslen) return;
        int type = b[at] >> 4;
        if (type == 2 && (len < 2 || b[i + 1] != 0)) { close_conn(c); return; }
        at = i + len;
        if (type == 9) { became_open(c, c->hs + at, c->hslen - at, t); return; }
    }
}

static void readable(conn_t *c) {
    char *data = rbuf + TAIL;
    ssize_t r = read(c->fd, data, RBUF);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) { close_conn(c); return; }
    if (r < 0) return;
    double t = now();
    if (c->state == HANDSHAKE) {
        int room = sizeof c->hs - c->hslen;
        if (r > room) {
            /* handshake and a first burst of data in one read: only ever the tail end */
            memcpy(c->hs + c->hslen, data, room);
            c->hslen += room;
            handshake_data(c, t);
            if (c->state == OPEN) {
                int keep = scan(data + room, r - room, t);
                memcpy(c->tail, data + r - keep, keep);
                c->taillen = keep;
            }
            return;
        }
        memcpy(c->hs + c->hslen, data, r);
        c->hslen += r;
        handshake_data(c, t);
        return;
    }
    char *p = data - c->taillen;
    memcpy(p, c->tail, c->taillen);
    int len = r + c->taillen;
    int keep = scan(p, len, t);
    memcpy(c->tail, p + len - keep, keep);
    c->taillen = keep;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double q) {
    if (!nlat) return -1;
    size_t i = (size_t)(q * (nlat - 1) + 0.5);
    return lat[i];
}

static void keepalive(void) {
    /* a masked text "ping" (mask 0): any client frame is activity for iotd; the peer answers it */
    static const unsigned char ping[] = {0x81, 0x84, 0, 0, 0, 0, 'p', 'i', 'n', 'g'};
    if (mqtt) return;
    for (int i = 0; i < next_conn; i++)
        if (conns[i].state == OPEN) write(conns[i].fd, ping, sizeof ping);
}

static void command(const char *line) {
    if (!strncmp(line, "reset", 5)) {
        nlat = 0; events = 0; first_t = last_t = 0;
    } else if (!strncmp(line, "tick", 4)) {
        printf("count %.6f %lld %d %.6f\n", now(), events, opened, last_t);
    } else if (!strncmp(line, "report", 6)) {
        qsort(lat, nlat, sizeof(double), cmp);
        printf("report {\"open\":%d,\"events\":%lld,\"first\":%.6f,\"last\":%.6f,\"p50\":%.3f,\"p99\":%.3f,"
               "\"max\":%.3f,\"lost\":%d,\"failed\":%d}\n",
               opened, events, first_t, last_t, pct(0.5), pct(0.99), nlat ? lat[nlat - 1] : -1, lost, failed);
    } else if (!strncmp(line, "quit", 4)) {
        exit(0);
    }
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: fanclient ws|mqtt HOST PORT N SPREAD TEMPLATE\n");
        return 2;
    }
    mqtt = !strcmp(argv[1], "mqtt");
    host = argv[2]; port = atoi(argv[3]); n = atoi(argv[4]); spread = atoi(argv[5]); tmpl = argv[6];
    if (spread < 1) spread = 1;
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    conns = calloc(n, sizeof(conn_t));
    ep = epoll_create1(0);
    struct epoll_event se = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &se);
    fill();
    int announced = 0;
    char line[256];
    int linelen = 0;
    double next_ping = now() + 20;
    struct epoll_event evs[512];
    for (;;) {
        int k = epoll_wait(ep, evs, 512, 250);
        for (int i = 0; i < k; i++) {
            conn_t *c = evs[i].data.ptr;
            if (!c) {
                char b[256];
                ssize_t r = read(0, b, sizeof b);
                if (r <= 0) return 0;
                for (ssize_t j = 0; j < r; j++) {
                    if (b[j] == '\n') { line[linelen] = 0; command(line); linelen = 0; }
                    else if (linelen < (int)sizeof line - 1) line[linelen++] = b[j];
                }
                continue;
            }
            if (c->state == CLOSED) continue;
            if (c->state == CONNECTING) {
                int err = 0;
                socklen_t l = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
                if (err) { close_conn(c); continue; }
                if (evs[i].events & EPOLLOUT) {
                    watch(c, EPOLLIN, EPOLL_CTL_MOD);
                    send_handshake(c);
                }
                continue;
            }
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) readable(c);
        }
        fill();
        if (!announced && next_conn == n && inflight == 0) {
            printf("ready %d %d\n", opened, failed);
            fflush(stdout);
            announced = 1;
        }
        if (now() > next_ping) { keepalive(); next_ping = now() + 20; }
    }
}
