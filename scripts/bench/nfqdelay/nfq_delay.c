/*
 * nfq_delay: add a constant one-way delay to the packets of one NFQUEUE queue.
 *
 * The bench kernel has no sch_netem, so an iptables rule in the router namespace sends every
 * forwarded packet to this queue; each packet is accepted DELAY_US after it arrived. A constant
 * delay keeps packets in order, so a FIFO of (packet id, release time) is all the state needed.
 * Only packet metadata is copied to userspace and GSO packets are taken whole.
 *
 * usage: nfq_delay QUEUE_NUM DELAY_US
 * SIGINT/SIGTERM: accept whatever is still held and exit 0.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <libnetfilter_queue/libnetfilter_queue.h>
#include <linux/netfilter.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>

#define FIFO_SLOTS 65536u /* power of two; the kernel queue is capped below this */
#define KERNEL_QUEUE_MAX 60000u

struct pending {
  uint32_t packet_id;
  uint64_t release_ns;
};

static struct pending fifo[FIFO_SLOTS];
static uint32_t fifo_head, fifo_tail; /* held packets are fifo[head..tail) modulo FIFO_SLOTS */
static uint64_t delay_ns;
static volatile sig_atomic_t stopping;

static uint64_t monotonic_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int on_packet(struct nfq_q_handle *queue, struct nfgenmsg *msg, struct nfq_data *data, void *ctx) {
  (void)msg;
  (void)ctx;
  struct nfqnl_msg_packet_hdr *hdr = nfq_get_msg_packet_hdr(data);
  if (hdr == NULL) return 0;
  uint32_t id = ntohl(hdr->packet_id);
  if (fifo_tail - fifo_head == FIFO_SLOTS) { /* cannot hold more: better late than lost */
    return nfq_set_verdict(queue, id, NF_ACCEPT, 0, NULL);
  }
  fifo[fifo_tail % FIFO_SLOTS] = (struct pending){id, monotonic_ns() + delay_ns};
  fifo_tail++;
  return 0;
}

/* Accept every held packet that is due (all of them when `all`). */
static void release(struct nfq_q_handle *queue, int all) {
  uint64_t now = monotonic_ns();
  while (fifo_head != fifo_tail) {
    struct pending *p = &fifo[fifo_head % FIFO_SLOTS];
    if (!all && p->release_ns > now) break;
    nfq_set_verdict(queue, p->packet_id, NF_ACCEPT, 0, NULL);
    fifo_head++;
  }
}

static void on_signal(int sig) {
  (void)sig;
  stopping = 1;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s QUEUE_NUM DELAY_US\n", argv[0]);
    return 2;
  }
  uint16_t queue_num = (uint16_t)strtoul(argv[1], NULL, 10);
  delay_ns = strtoull(argv[2], NULL, 10) * 1000u;

  struct sigaction sa = {0};
  sa.sa_handler = on_signal;
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);

  struct nfq_handle *h = nfq_open();
  if (h == NULL) {
    perror("nfq_open");
    return 1;
  }
  struct nfq_q_handle *queue = nfq_create_queue(h, queue_num, on_packet, NULL);
  if (queue == NULL) {
    perror("nfq_create_queue");
    return 1;
  }
  if (nfq_set_mode(queue, NFQNL_COPY_META, 0) < 0 || nfq_set_queue_maxlen(queue, KERNEL_QUEUE_MAX) < 0) {
    perror("configuring the queue");
    return 1;
  }
  nfq_set_queue_flags(queue, NFQA_CFG_F_GSO, NFQA_CFG_F_GSO);
  int fd = nfq_fd(h);
  int one = 1; /* a burst larger than the socket buffer must not wedge the queue */
  setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof one);
  nfnl_rcvbufsiz(nfq_nfnlh(h), 8u << 20);
  fprintf(stderr, "nfq_delay: queue %u, delay %llu us\n", queue_num, (unsigned long long)(delay_ns / 1000));

  static char buf[1 << 16];
  while (!stopping) {
    int timeout_ms = -1;
    if (fifo_head != fifo_tail) {
      uint64_t due = fifo[fifo_head % FIFO_SLOTS].release_ns, now = monotonic_ns();
      timeout_ms = due > now ? (int)((due - now + 999999u) / 1000000u) : 0;
    }
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    int ready = poll(&pfd, 1, timeout_ms);
    if (ready < 0 && errno != EINTR) {
      perror("poll");
      break;
    }
    if (ready > 0) {
      for (;;) { /* drain what is queued without blocking */
        ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n <= 0) break;
        nfq_handle_packet(h, buf, (int)n);
      }
    }
    release(queue, 0);
  }
  release(queue, 1);
  nfq_destroy_queue(queue);
  nfq_close(h);
  return 0;
}
