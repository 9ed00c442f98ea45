/* Guest "bs1": a boot sector (SeaBIOS loads it at 0x7c00, real mode) looping on COM1 forever.
 * Each iteration, exactly:
 *     IN  0x3fd   (line status; forwarded to the device model)
 *     OUT 0x3f8   (one byte to the serial line: '.', or '\n' every 64th iteration)
 *     OUT 0x80    (POST code port)
 * so the bytes it prints while it runs are its iteration count: the guest's own truth. A command
 * from Dom0 on COM1 ('S' stop, 'G' go: hold.inc) is read after a whole iteration. */
    .code16
    .globl _start
_start:
    cli
    xor  %ax, %ax
    mov  %ax, %ds
    mov  %ax, %ss
    mov  $0x7c00, %sp
    call serial_setup
    xor  %cx, %cx
next:
    mov  $0x3fd, %dx
    inb  %dx, %al               /* IN 0x3fd */
    mov  %al, %bl
    inc  %cx
    mov  $'.', %al
    test $63, %cx
    jnz  1f
    mov  $'\n', %al
1:  mov  $0x3f8, %dx
    outb %al, %dx               /* OUT 0x3f8 */
    outb %al, $0x80             /* OUT 0x80 */
    call poll                   /* a command from Dom0? */
    jmp  next

    .include "hold.inc"

    .org 510
    .word 0xaa55
